"""bench/peer: Goldilocks and OVN side by side on one workload (`python -m bench.peer`).

workload.py describes the workload once for both systems; gold.py runs the real `goldilocks run`
on a private OvsSandbox, ovn.py OVN's daemons on another; common.py holds what both measure with
(flow counts, a flow monitor, polling, the traffic check); report.py writes the markdown section.
See bench/README.md.
"""
