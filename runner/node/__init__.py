"""What the runner and the controller share about the node: cgroupfs, the cgroup root's
layout, kubelet's state, and the float keeper."""
