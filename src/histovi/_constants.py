"""Keys shared by the stages of histovi (io -> pp -> model -> tl -> metrics/pl).

Each stage writes its result under one of these keys and the next stage reads it from there.
"""

#: ``adata.obsm`` key of spot centres (squidpy / scanpy convention).
SPATIAL_KEY = "spatial"
#: ``adata.obsm`` key of the (n_obs, k) int64 matrix of neighbour row indices within each sample.
NEIGHBORS_KEY = "spatial_neighbors"
#: ``adata.obsm`` key of the per-spot morphology embedding (NaN rows where a spot has no image).
MORPHOLOGY_KEY = "X_morphology"
#: ``adata.obsm`` key written by :meth:`histovi.HistoVI.get_latent_representation` in the CLI.
LATENT_KEY = "X_histovi"
#: ``adata.uns`` key under which histovi records how each stage was run.
UNS_KEY = "histovi"
