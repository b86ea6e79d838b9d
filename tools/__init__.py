"""Operator programs behind the shm-taskwork command."""
