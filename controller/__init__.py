"""Goldilocks: context-aware microsegmentation for Open vSwitch hypervisors."""
