"""Boot loaders: each turns an image into guest memory contents and an
initial vCPU state (:class:`vmscope.devices.pvh.BootPlan`).

``load_kernel`` picks the loader from the image's contents: PVH ELF
kernels (``vmscope.devices.pvh``, shared with the emulated CPU) and Linux bzImages (``linux.py``).
"""

from vmscope.kvm.boot.common import BootPlan, load_kernel

__all__ = ["BootPlan", "load_kernel"]
