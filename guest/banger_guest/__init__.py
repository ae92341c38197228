"""banger's guest side: the agent that runs in every VM, and the wire format it speaks
with the host (``protocol``, imported by the host side too). Standard library only."""

__version__ = "0.1.0"
