"""Test support: tiny seeded models and HF references (``models``), generation and attention references
(``inference``, ``attention``), the multi-process spawner on free loopback ports (``spawn``). Imports anything;
imported by nothing in the product.
"""
