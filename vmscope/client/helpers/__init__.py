"""Helpers that reach guest memory and registers faster than RSP.

:func:`vmscope.client.session.open_session` picks the fastest that works:
shared RAM through QEMU's QMP, then RSP (physical mode where the stub
offers it)."""
