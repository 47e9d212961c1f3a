"""Fakes at external boundaries (cloud APIs) that keep the real client libraries in the loop."""
