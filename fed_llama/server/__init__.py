"""The aggregator: aggregation of adapter updates (Flower ServerApp and strategies to come)."""
