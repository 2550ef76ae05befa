"""The x86 KVM back end: the machine (``machine.py``, exits in
``exits.py``) and its debug target (``target.py`` and the mixins beside it:
registers, memory, breakpoints, page protection, page stepping, monitor)."""
