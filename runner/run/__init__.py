"""The runner: the VM pod's PID 1."""
