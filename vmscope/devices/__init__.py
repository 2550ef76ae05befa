"""What every back end gives a guest, whatever runs its instructions.

KVM on x86, KVM on arm64 and the emulated CPU (Unicorn) share these pieces,
so a fix to the UART, to guest RAM or to image loading reaches all of them:

- :mod:`.ram`: guest-physical RAM as one memfd mapping (introspection maps
  the same pages from another process);
- :mod:`.uart16550` and :mod:`.pl011`: the serial ports the guests print
  through (x86 COM1, QEMU virt's PL011);
- :mod:`.console`: the host side of the serial console (terminal raw mode,
  Ctrl-A x, piped input, line output);
- :mod:`.elf` and :mod:`.pvh`: loading ELF images, and the PVH boot
  protocol (notes, ``hvm_start_info``) x86 guests start through.

Nothing here knows which back end runs the guest.
"""
