"""The HistoVI variational autoencoder (pure torch; no AnnData in here).

Views of a spot and how they enter the model:

* expression counts ``x``: encoder expert q(z | x, s) and negative-binomial decoder p(x | z, s);
* embedding views (morphology, foundation-model embeddings): one encoder expert q(z | m, s) each
  and a Gaussian decoder p(m | z, s); a spot without a view (mask 0) simply lacks that expert
  and that reconstruction term;
* the spatial neighbourhood: a negative-binomial decoder of the summed counts of the spot's
  neighbours (the niche), which makes z describe the spot's surroundings as well as the spot.
  The domain latent of a spot is then its own latent propagated over the spatial graph with a
  mix ``spatial_mix`` per latent dimension, fitted to the study after training
  (:mod:`histovi.model._spatial`); the propagation lives outside the module, which only keeps
  the fitted mix with its weights.

The experts are fused as a product of Gaussian experts with the standard-normal prior as one
expert, so missing views are handled by construction; each view expert's precision is scaled by
a learned gate per latent dimension. Batch (``s``) and covariates enter every encoder and
decoder, so that scArches can train new batch columns for a query.
"""

from __future__ import annotations

import torch
from scvi import REGISTRY_KEYS
from scvi.distributions import NegativeBinomial
from scvi.module.base import BaseModuleClass, LossOutput, auto_move_data
from scvi.nn import DecoderSCVI, Encoder, FCLayers
from torch import nn
from torch.distributions import Normal, kl_divergence

NICHE_KEY = "niche_counts"
NEIGHBORS_REGISTRY_KEY = "spatial_neighbors"


def view_registry_key(name: str) -> str:
    return f"view_{name}"


# below this share of non-zero counts the log-gamma terms are evaluated on the non-zeros only
_SPARSE_NB_DENSITY = 0.35


def nb_log_likelihood(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """log NB(x | mu, theta) summed over genes, one value per spot: the value and gradients of
    ``scvi.distributions.NegativeBinomial(mu, theta).log_prob(x).sum(-1)`` (same ``eps``) for a
    dispersion ``theta`` per gene (shape ``(n_genes,)``), computed with far fewer log-gamma
    evaluations.

    scvi-tools' version broadcasts theta to ``spots x genes`` and evaluates lgamma(x + theta),
    lgamma(theta) and lgamma(x + 1) there, and digamma twice in the backward pass; on a CPU those
    are half of a training step, and HistoVI has two such likelihoods (expression and niche).
    Here lgamma(theta) is evaluated once per gene, lgamma(x + 1) outside autograd, and for
    sparse counts lgamma(x + theta) - lgamma(theta) only where x > 0 (it is 0 where x = 0)."""
    if theta.dim() != 1 or mu.shape != x.shape:
        return NegativeBinomial(mu=mu, theta=theta).log_prob(x).sum(-1)
    log_theta_mu = torch.log(theta + mu + eps)
    dense = theta * (torch.log(theta + eps) - log_theta_mu) + x * (
        torch.log(mu + eps) - log_theta_mu
    )
    nonzero = x > 0
    lgamma_theta = torch.lgamma(theta)
    if x.device.type != "cpu" or nonzero.float().mean() > _SPARSE_NB_DENSITY:
        # dense counts, or a GPU, where elementwise work is cheap and nonzero() waits for it
        with torch.no_grad():
            log_x_factorial = torch.lgamma(x + 1)
        out = (dense + torch.lgamma(x + theta) - log_x_factorial).sum(-1)
        return out - lgamma_theta.sum()
    flat = nonzero.reshape(-1, x.shape[-1])
    rows, cols = flat.nonzero(as_tuple=True)
    counts = x.reshape(-1, x.shape[-1])[rows, cols]
    with torch.no_grad():
        log_x_factorial = torch.lgamma(counts + 1)
    out = dense.reshape(-1, x.shape[-1]).sum(-1)
    # index_select, not theta[cols]: the backward of advanced indexing accumulates with
    # atomic adds on a multithreaded CPU (run-to-run differences); index_select's does not
    out = out.index_add(
        0, rows, torch.lgamma(counts + theta.index_select(0, cols)) - log_x_factorial
    )
    out = out - flat.to(theta.dtype) @ lgamma_theta
    return out.reshape(x.shape[:-1])


def _decode_nb(decoder: DecoderSCVI, z_in, log_library, cat_list):
    """Mean proportions and rates of a :class:`scvi.nn.DecoderSCVI` (as its ``forward`` with
    gene dispersion), without evaluating its zero-inflation head, which a negative binomial does
    not use."""
    px_scale = decoder.px_scale_decoder(decoder.px_decoder(z_in, *cat_list))
    return px_scale, torch.exp(log_library) * px_scale


class GaussianViewDecoder(nn.Module):
    """p(m | z, s): a Gaussian with batch-conditioned mean and a learned variance per dimension."""

    def __init__(self, n_latent, n_output, n_cat_list, n_hidden, n_layers, dropout_rate):
        super().__init__()
        self.decoder = FCLayers(
            n_in=n_latent,
            n_out=n_hidden,
            n_cat_list=n_cat_list,
            n_layers=n_layers,
            n_hidden=n_hidden,
            dropout_rate=dropout_rate,
            inject_covariates=True,
            use_batch_norm=False,
            use_layer_norm=True,
        )
        self.mean = nn.Linear(n_hidden, n_output)
        self.log_var = nn.Parameter(torch.zeros(n_output))

    def forward(self, z, *cat_list):
        return Normal(self.mean(self.decoder(z, *cat_list)), self.log_var.exp().sqrt())


class HistoVAE(BaseModuleClass):
    """Multi-view VAE of spatial spots with a niche decoder.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batches (samples).
    view_dims
        Width of each embedding view, e.g. ``{"morphology": 64}``.
    view_means, view_stds
        Per-dimension centring and scaling of each view, one vector for all spots or one row per
        sample (``n_batch x dim``), stored as buffers so that a reference's samples are
        standardised the same way when a query is mapped.
    n_latent, n_hidden, n_layers, dropout_rate
        Network sizes, as in scVI.
    use_niche
        Reconstruct the summed counts of each spot's spatial neighbours from z.
    niche_weight
        Weight of the niche reconstruction term (per neighbour: the summed counts of k
        neighbours are scaled by ``niche_weight / k``).
    n_neighbors
        Number of spatial neighbours (k) the niche counts are summed over.
    encode_covariates
        Give the encoders the covariates (needed for scArches query columns in the encoders).
    view_dropout
        Share of spots whose embedding views are hidden from the encoder at each training step.
    view_gating
        Scale each view expert's precision by a learned gate per latent dimension, trained only
        by how well the latent explains the expression (and the niche): a view enters the latent
        as far as it helps to explain the counts, so a weak or section-shifted view is gated out
        instead of overriding the expression.
    normalize_input
        Scale each spot's counts to 10,000 before the log that feeds the encoders, so that
        sequencing depth does not enter z (the decoders use the observed library).
    n_cats_per_cov, n_continuous_cov
        Extra categorical and continuous covariates.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int,
        view_dims: dict[str, int] | None = None,
        view_means: dict[str, torch.Tensor] | None = None,
        view_stds: dict[str, torch.Tensor] | None = None,
        n_latent: int = 16,
        n_hidden: int = 128,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        use_niche: bool = True,
        niche_weight: float = 1.0,
        n_neighbors: int = 6,
        view_dropout: float = 0.3,
        n_cats_per_cov: list[int] | None = None,
        n_continuous_cov: int = 0,
        encode_covariates: bool = True,
        normalize_input: bool = True,
        view_gating: bool = True,
    ):
        super().__init__()
        self.n_input = n_input
        self.n_batch = n_batch
        self.n_latent = n_latent
        self.view_names = list(view_dims or {})
        self.use_niche = use_niche
        self.niche_weight = niche_weight
        self.n_neighbors = max(int(n_neighbors), 1)
        self.view_dropout = view_dropout
        self.normalize_input = normalize_input
        self.encode_covariates = encode_covariates
        self.n_continuous_cov = n_continuous_cov
        self.view_gating = bool(view_gating) and bool(view_dims)
        if self.view_gating:
            # log of each view's gate per latent dimension; 0: the view's expert as it is
            self.view_log_gates = nn.Parameter(torch.zeros(len(view_dims), n_latent))
        # the neighbours' share of each latent dimension of the domain latent, fitted after
        # training (model/_spatial.py), not by gradient; 0 = the spot's own latent
        self.register_buffer("spatial_mix", torch.zeros(n_latent))
        # The same covariate list feeds every encoder and decoder (see HistoVI.load_query_data).
        cat_list = [n_batch] + list(n_cats_per_cov or [])
        self.cat_list = cat_list
        n_cont = n_continuous_cov

        # Every network takes the covariates in every layer and uses layer norm (batch norm
        # statistics would carry batch effects, and scArches freezes them awkwardly).
        net = {
            "n_cat_list": cat_list,
            "n_layers": n_layers,
            "n_hidden": n_hidden,
            "inject_covariates": True,
            "use_batch_norm": False,
            "use_layer_norm": True,
        }
        enc = dict(net, n_cat_list=cat_list if encode_covariates else None)
        self.z_encoder = Encoder(n_input + n_cont, n_latent, dropout_rate=dropout_rate, **enc)
        self.decoder = DecoderSCVI(n_latent + n_cont, n_input, **net)
        self.px_r = nn.Parameter(torch.randn(n_input))

        self.view_encoders = nn.ModuleDict()
        self.view_decoders = nn.ModuleDict()
        for name, dim in (view_dims or {}).items():
            self.view_encoders[name] = Encoder(
                dim + n_cont, n_latent, dropout_rate=dropout_rate, **enc
            )
            self.view_decoders[name] = GaussianViewDecoder(
                n_latent + n_cont, dim, cat_list, n_hidden, n_layers, dropout_rate
            )
            mean = (view_means or {}).get(name, torch.zeros(dim))
            std = (view_stds or {}).get(name, torch.ones(dim))
            self.register_buffer(f"_view_mean_{name}", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer(f"_view_std_{name}", torch.as_tensor(std, dtype=torch.float32))

        if use_niche:
            self.niche_decoder = DecoderSCVI(n_latent + n_cont, n_input, **net)
            self.niche_r = nn.Parameter(torch.randn(n_input))

    # ------------------------------------------------------------------ helpers
    def _covariates(self, tensors):
        batch = tensors[REGISTRY_KEYS.BATCH_KEY]
        cat = tensors.get(REGISTRY_KEYS.CAT_COVS_KEY)
        cat_list = [batch] + (list(torch.split(cat, 1, dim=1)) if cat is not None else [])
        cont = tensors.get(REGISTRY_KEYS.CONT_COVS_KEY)
        return cat_list, cont

    def _standardise_view(self, name, values, batch=None):
        mask = ~torch.isnan(values).any(-1)
        values = torch.nan_to_num(values, nan=0.0)
        mean = getattr(self, f"_view_mean_{name}")
        std = getattr(self, f"_view_std_{name}")
        if mean.dim() == 2:  # one row per sample (stain and scanner differ between sections)
            rows = batch.long().view(-1)
            mean, std = mean[rows], std[rows]
        values = (values - mean) / std
        return values * mask.unsqueeze(-1), mask.float()

    def _with_cont(self, z, cont):
        return z if cont is None else torch.cat([z, cont.expand(*z.shape[:-1], -1)], dim=-1)

    # ------------------------------------------------------------------ scvi-tools API
    def _get_inference_input(self, tensors):
        cat_list, cont = self._covariates(tensors)
        views = {
            name: tensors[view_registry_key(name)]
            for name in self.view_names
            if view_registry_key(name) in tensors
        }
        return {
            "x": tensors[REGISTRY_KEYS.X_KEY],
            "cat_list": cat_list,
            "cont": cont,
            "views": views,
        }

    def _get_generative_input(self, tensors, inference_outputs):
        cat_list, cont = self._covariates(tensors)
        # The neighbours' counts are gathered by the training data loader only; their total is
        # the niche decoder's library size.
        niche = tensors.get(NICHE_KEY)
        return {
            "z": inference_outputs["z"],
            "library": inference_outputs["library"],
            "cat_list": cat_list,
            "cont": cont,
            "niche_library": None if niche is None else niche.sum(-1, keepdim=True),
            "z_views": inference_outputs.get("z_views"),
        }

    @auto_move_data
    def inference(self, x, cat_list, cont=None, views=None, n_samples: int = 1):
        """q(z | x, views, s) as a product of Gaussian experts (the N(0, I) prior included)."""
        library = x.sum(-1, keepdim=True)
        x_in = self._log_input(x, cont)
        view_inputs, encoder_masks = {}, {}
        for name in self.view_names:
            if views is None or name not in views:
                continue
            values, mask = self._standardise_view(name, views[name], cat_list[0])
            view_inputs[name] = (values, mask)
            if self.training and self.view_dropout > 0:
                # Hide the view from the encoder for a random share of spots (it is still
                # reconstructed), so spots and whole samples without the view land in the
                # same place as those with it instead of forming their own clusters.
                keep = torch.rand_like(mask) >= self.view_dropout
                mask = mask * keep
            encoder_masks[name] = mask
        experts = self._experts(x_in, {n: v for n, (v, _) in view_inputs.items()}, cat_list, cont)
        precision, weighted_mean = self._product(experts, encoder_masks)
        precision = precision + 1.0
        mean = weighted_mean / precision
        qz = Normal(mean, precision.rsqrt())
        shape = mean.shape if n_samples == 1 else (n_samples, *mean.shape)
        eps = torch.randn(shape, device=mean.device, dtype=mean.dtype)
        z = mean + precision.rsqrt() * eps
        z_views = z
        if self.view_gating and self.training and len(encoder_masks):
            # The view decoders see the same draw from a posterior whose gates are constants: a
            # gate learns only from how well the latent explains the expression (and the
            # niche), never from how well it reproduces the view itself.
            fixed_precision, fixed_weighted_mean = self._product(
                experts, encoder_masks, detach_gates=True
            )
            fixed_precision = fixed_precision + 1.0
            z_views = fixed_weighted_mean / fixed_precision + fixed_precision.rsqrt() * eps
        return {
            "z": z,
            "z_views": z_views,
            "qz": qz,
            "library": library,
            "view_inputs": view_inputs,
        }

    def _log_input(self, counts, cont):
        if self.normalize_input:
            # Depth differs tenfold between sections of one study; the decoder gets the observed
            # library, so z need not (and should not) carry it.
            counts = counts / counts.sum(-1, keepdim=True).clamp(min=1.0) * 1e4
        out = torch.log1p(counts)
        return out if cont is None else torch.cat([out, cont], dim=-1)

    def _experts(self, x_in, view_values, cat_list, cont) -> dict:
        """Each encoder's Gaussian expert, ``name -> (mean, variance)`` (``"expression"`` and
        every view given)."""
        enc_cats = cat_list if self.encode_covariates else []
        mu_x, var_x, _ = self.z_encoder(x_in, *enc_cats)
        experts = {"expression": (mu_x, var_x)}
        for name, values in view_values.items():
            v_in = values if cont is None else torch.cat([values, cont], dim=-1)
            mu_v, var_v, _ = self.view_encoders[name](v_in, *enc_cats)
            experts[name] = (mu_v, var_v)
        return experts

    def view_gates(self) -> dict[str, torch.Tensor | None]:
        """Each view's gate per latent dimension: the factor on its expert's precision."""
        if not self.view_gating:
            return {name: None for name in self.view_names}
        gates = self.view_log_gates.exp()
        return {name: gates[i] for i, name in enumerate(self.view_names)}

    def _product(self, experts, view_masks, detach_gates: bool = False):
        """Precision and precision-weighted mean of the product of the data's experts
        (expression, and each view where its mask is 1, its precision scaled by its gate);
        no prior."""
        mu_x, var_x = experts["expression"]
        precision = 1.0 / var_x
        weighted_mean = mu_x / var_x
        gates = self.view_gates()
        for name, mask in view_masks.items():
            mu_v, var_v = experts[name]
            weight = mask.unsqueeze(-1) / var_v
            gate = gates.get(name)
            if gate is not None:
                weight = weight * (gate.detach() if detach_gates else gate)
            precision = precision + weight
            weighted_mean = weighted_mean + weight * mu_v
        return precision, weighted_mean

    @auto_move_data
    def generative(
        self,
        z,
        library,
        cat_list,
        cont=None,
        niche_library=None,
        transform_batch=None,
        z_views=None,
    ):
        if transform_batch is not None:
            cat_list = [torch.full_like(cat_list[0], int(transform_batch))] + list(cat_list[1:])
        z_in = self._with_cont(z, cont)
        px_scale, px_rate = _decode_nb(self.decoder, z_in, torch.log(library), cat_list)
        px = NegativeBinomial(mu=px_rate, theta=self.px_r.exp(), scale=px_scale)
        out = {"px": px, "pz": Normal(torch.zeros_like(z), torch.ones_like(z))}
        zv_in = z_in if z_views is None or z_views is z else self._with_cont(z_views, cont)
        out["pviews"] = {
            name: self.view_decoders[name](zv_in, *cat_list) for name in self.view_names
        }
        if self.use_niche and niche_library is not None:
            niche_scale, niche_rate = _decode_nb(
                self.niche_decoder, z_in, torch.log(niche_library.clamp(min=1.0)), cat_list
            )
            # negative binomial, not Poisson: neighbours of one domain are correlated, so their
            # summed counts stay over-dispersed; a Poisson niche (tried) over-weighted the niche
            # term and let the latent follow the patients (her2st ARI 0.28 vs 0.37)
            out["pniche"] = NegativeBinomial(
                mu=niche_rate, theta=self.niche_r.exp(), scale=niche_scale
            )
        return out

    def loss(self, tensors, inference_outputs, generative_outputs, kl_weight: float = 1.0):
        x = tensors[REGISTRY_KEYS.X_KEY]
        qz = inference_outputs["qz"]
        kl_z = kl_divergence(qz, Normal(torch.zeros_like(qz.loc), torch.ones_like(qz.scale))).sum(
            -1
        )
        rec_x = -nb_log_likelihood(x, generative_outputs["px"].mu, self.px_r.exp())
        reconstruction = {"expression": rec_x}

        for name, (values, mask) in inference_outputs["view_inputs"].items():
            nll = -generative_outputs["pviews"][name].log_prob(values).sum(-1)
            reconstruction[name] = nll * mask

        if "pniche" in generative_outputs and NICHE_KEY in tensors:
            niche = tensors[NICHE_KEY]
            nll = -nb_log_likelihood(niche, generative_outputs["pniche"].mu, self.niche_r.exp())
            reconstruction["niche"] = nll * (self.niche_weight / self.n_neighbors)

        loss = torch.mean(sum(reconstruction.values()) + kl_weight * kl_z)
        return LossOutput(loss=loss, reconstruction_loss=reconstruction, kl_local={"kl_z": kl_z})
