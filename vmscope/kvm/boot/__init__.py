"""Boot loaders: each turns an image into guest memory contents and an
initial vCPU state (:class:`vmscope.kvm.boot.common.BootPlan`).

``load_kernel`` picks the loader from the image's contents. Today: PVH ELF
kernels. A bzImage gets a clear error until the Linux-guest issue adds
``linux.py``.
"""

from vmscope.kvm.boot.common import BootPlan, load_kernel

__all__ = ["BootPlan", "load_kernel"]
