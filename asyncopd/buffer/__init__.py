"""The staleness-aware buffer (pure logic). See :mod:`asyncopd.buffer.buffer`."""

from asyncopd.buffer.buffer import BufferStats, StalenessBuffer

__all__ = ["BufferStats", "StalenessBuffer"]
