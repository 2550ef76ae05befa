"""Linux guests without their vmlinux: KASLR (:mod:`.kaslr`), symbols from
kallsyms (:mod:`.kallsyms`), layouts from BTF (:mod:`.btf`), and the OS
objects built on them (:mod:`.tasks`, :mod:`.modules`, :mod:`.printk`,
:mod:`.clock`), all reached through :class:`.kernel.LinuxKernel`."""
