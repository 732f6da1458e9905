"""Development tooling of cutile-kernels: the variant build, tiny checkpoints, the demo, CI checks.

Not part of the kernel package: nothing here ships to the Hub.
"""
