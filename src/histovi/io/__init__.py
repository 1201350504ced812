"""Readers and writers: SpatialData, MuData, AnnData with image files."""
