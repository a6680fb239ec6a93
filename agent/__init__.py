"""Goldilocks guest agent and hypervisor relay (stdlib + PyYAML only).

- `agent.guest`: runs inside a VM, observes users, apps, OS, labels and posture, and sends
  them over its per-VM channel (vsock, or a unix socket in simulation).
- `agent.relay`: runs on a hypervisor, listens on one channel per VM, decides which VM is
  speaking (never the guest), checks sequence numbers and rates, and forwards to the API.
"""
