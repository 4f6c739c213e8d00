"""Backbones, task heads and the multi-task model that shares one backbone among them."""
