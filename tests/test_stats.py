import torch

from flap_deploy.pruning.stats import ChannelStats


def test_streaming_stats_equal_torch_over_concatenated_inputs():
    g = torch.Generator().manual_seed(0)
    # Uneven batches, a large common offset and channels of very different scales: the cases in
    # which a naive (or aliased) running update drifts from the exact variance.
    batches = [
        (1000.0 + torch.randn(n, 7, 12, generator=g, dtype=torch.float64) * torch.logspace(-3, 2, 12, dtype=torch.float64))
        .to(torch.float32)
        for n in (1, 3, 8, 2, 5)
    ]
    stats = ChannelStats(12)
    for b in batches:
        stats.update(b)
    flat = torch.cat([b.reshape(-1, 12) for b in batches]).double()
    assert stats.count == flat.shape[0]
    torch.testing.assert_close(stats.mean, flat.mean(dim=0), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.var, flat.var(dim=0), rtol=1e-10, atol=0)
    torch.testing.assert_close(stats.mean_square, flat.square().mean(dim=0), rtol=1e-10, atol=0)


def test_batching_does_not_change_the_result():
    x = torch.randn(64, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    one, many = ChannelStats(5), ChannelStats(5)
    one.update(x)
    for chunk in x.split(7):
        many.update(chunk)
    torch.testing.assert_close(one.var, many.var, rtol=1e-12, atol=0)
    torch.testing.assert_close(one.mean, many.mean, rtol=1e-12, atol=1e-15)
