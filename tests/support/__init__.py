"""Test support: helpers the test modules share, so no test imports from another test module.

``conftest.py`` files hold only fixtures and import what they need from here.
"""
