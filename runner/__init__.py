"""instance-runner: dedicated, NUMA-local CPUs for the vCPUs of a VM in a Kubernetes pod."""

__version__ = "0.1.0"
