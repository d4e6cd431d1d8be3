"""SpillingRows: rows in memory up to a budget, then in an unlinked temporary file, memory-mapped."""

from __future__ import annotations

import pytest
import torch

from adamerge.storage.spill import SpillingRows


@pytest.mark.parametrize("budget", [0, 10 * 7 * 4, 1 << 30])
def test_rows_come_back_in_order_whatever_the_budget(tmp_path, budget):
    torch.manual_seed(0)
    chunks = [torch.randn(n, 7) for n in (3, 5, 1, 9)]
    rows = SpillingRows(budget, directory=tmp_path)
    starts = [rows.append(chunk) for chunk in chunks]
    assert starts == [0, 3, 8, 9]
    assert list(tmp_path.iterdir()) == []  # the file, if any, is already unlinked
    assert rows.on_disk is (budget < 18 * 7 * 4)
    out = rows.finish()
    assert torch.equal(out, torch.cat(chunks)) and out.dtype == torch.float32
    assert list(tmp_path.iterdir()) == []


def test_spilled_rows_are_not_held_in_process_memory(tmp_path):
    """64 MiB of rows past a 1 MiB budget: the process's anonymous memory does not grow by them."""

    def anonymous_mib() -> float:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        return int(fields["RssAnon"].split()[0]) / 1024

    pytest.importorskip("os").stat("/proc/self/status")
    block = torch.ones(1024, 1024)  # 4 MiB
    rows = SpillingRows(1 << 20, directory=tmp_path)
    before = anonymous_mib()
    for i in range(16):
        rows.append(block.fill_(i))  # in place: no temporaries for the allocator to keep
    out = rows.finish()
    assert float(out[5 * 1024 : 6 * 1024].mean()) == 5.0 and float(out.sum()) == sum(range(16)) * 1024 * 1024
    assert anonymous_mib() - before < 16  # far below the 64 MiB written


def test_rows_of_another_width_are_refused():
    rows = SpillingRows(1 << 20)
    rows.append(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"expected \(n, 3\)"):
        rows.append(torch.zeros(2, 4))
