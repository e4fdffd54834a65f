"""Notification delivery: recipients, templates, notify fan-out, channel workers, providers.

The file list reads as the flow (see DESIGN.md): ``templates`` renders, ``providers/`` sends.
"""
