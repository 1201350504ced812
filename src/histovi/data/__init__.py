"""Data loading: minibatches with gathered spatial neighbours."""
