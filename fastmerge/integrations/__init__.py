"""Drop-in integrations of fastmerge into other libraries (``peft``: ``fastmerge.integrations.peft.enable()``).

Submodules import their library on first use; importing this package imports nothing else."""
