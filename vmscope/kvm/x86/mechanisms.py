"""Which debug mechanisms this host's KVM serves, measured on first use by
a probe VM (:mod:`vmscope.kvm.x86.probe`): debug-register watchpoints, or
page protection where data breakpoints do not fire (software KVM); INT3 and
DR execution breakpoints, or page protection where KVM does not see them
(KVM nested under QEMU's TCG SVM). ``VMSCOPE_KVM_WATCH`` and
``VMSCOPE_KVM_BREAKPOINTS`` force a choice.
"""

from __future__ import annotations

import os


def software_kvm() -> bool:
    """True on PVM-style software KVM (no VMX/SVM), where DR data
    watchpoints do not fire for emulated ring-0 accesses."""
    if os.path.isdir("/sys/module/kvm_pvm"):
        return True
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split()
                    return "vmx" not in flags and "svm" not in flags
    except OSError:
        pass
    return False


class DebugMechanisms:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def _init_mechanisms(self) -> None:
        # Which debug mechanisms this KVM serves is measured by a probe VM
        # (vmscope.kvm.x86.probe), on first use: a VM that nobody debugs does not
        # pay for it at start-up (0.3 s in the nested lab).
        self._watch_mode = os.environ.get("VMSCOPE_KVM_WATCH", "auto")
        if self._watch_mode not in ("auto", "pages", "debugregs"):
            raise ValueError(f"VMSCOPE_KVM_WATCH must be auto, pages or debugregs, not {self._watch_mode!r}")
        self._bp_mode = os.environ.get("VMSCOPE_KVM_BREAKPOINTS", "auto")
        if self._bp_mode not in ("auto", "pages", "native"):
            raise ValueError(f"VMSCOPE_KVM_BREAKPOINTS must be auto, pages or native, not {self._bp_mode!r}")
        self._mechanisms: tuple[bool, bool, bool] | None = None
        self._caps = None

    def _resolve_mechanisms(self) -> tuple[bool, bool, bool]:
        """(dr_watch, sw_pages, hw_pages) for this host's KVM."""
        if self._mechanisms is None:
            caps = None
            if "auto" in (self._watch_mode, self._bp_mode):
                from vmscope.kvm.x86.probe import probe

                try:
                    caps = probe()
                except OSError:
                    caps = None
            if self._watch_mode == "auto":
                dr_watch = caps.dr_write_watch if caps else not software_kvm()
            else:
                dr_watch = self._watch_mode == "debugregs"
            # Where KVM does not see INT3 or debug-register hits (KVM nested
            # under QEMU's TCG SVM), execution breakpoints use page protection.
            bp = self._bp_mode
            sw_pages = bp == "pages" or (bp == "auto" and caps is not None and caps.int3 == "guest")
            hw_pages = bp == "pages" or (bp == "auto" and caps is not None and not caps.dr_exec)
            self._caps = caps
            self._mechanisms = (dr_watch, sw_pages, hw_pages)
        return self._mechanisms

    @property
    def dr_watch(self) -> bool:
        return self._resolve_mechanisms()[0]

    @property
    def sw_pages(self) -> bool:
        return self._resolve_mechanisms()[1]

    @property
    def hw_pages(self) -> bool:
        return self._resolve_mechanisms()[2]

    @property
    def caps(self):
        self._resolve_mechanisms()
        return self._caps
