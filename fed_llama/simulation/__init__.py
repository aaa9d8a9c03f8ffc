"""Simulated federations on Flower's Simulation Engine."""
