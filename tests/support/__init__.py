"""Helpers the tests share: float64 references written from definitions, writers of real file
layouts, stand-ins for devices, and servers run in a subprocess. Tests import from here, never
from one another."""
