"""Unit tests of the worker stages that need no broker or model."""
