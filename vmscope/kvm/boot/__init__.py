"""Boot loaders: each turns an image into guest memory contents and an
initial vCPU state (:class:`vmscope.kvm.boot.common.BootPlan`).

``load_kernel`` picks the loader from the image's contents: PVH ELF
kernels (``pvh.py``) and Linux bzImages (``linux.py``).
"""

from vmscope.kvm.boot.common import BootPlan, load_kernel

__all__ = ["BootPlan", "load_kernel"]
