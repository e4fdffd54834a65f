"""Notification delivery: recipients, templates, notify fan-out, channel workers, providers."""
