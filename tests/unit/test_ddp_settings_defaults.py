"""DDP's options default to torch's own, but for gradients viewed in their buckets."""

from ddp.config import DDPConfig


def test_ddp_options_have_torchs_defaults_but_view_gradients_in_their_buckets():
    defaults = DDPConfig()
    assert (defaults.bucket_cap_mb, defaults.static_graph, defaults.find_unused_parameters) == (25.0, False, False)
    assert defaults.gradient_as_bucket_view  # saves a copy of every gradient per step
