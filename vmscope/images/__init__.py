"""Guest and lab images built from Debian's packages without installing them.

- :mod:`vmscope.images.linux`: Debian's cloud kernel + a busybox initramfs.
- :mod:`vmscope.images.initramfs` / :mod:`vmscope.images.cpio`: the builder.
- :mod:`vmscope.images.kernel` / :mod:`vmscope.images.debian`: fetching and
  unpacking packages into the cache (:mod:`vmscope.images.cache`).
"""
