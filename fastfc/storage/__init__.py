"""Floor 2, the storage objects: volumes (bytes cut into tracks, in memory or
memory-mapped), the metadata store every protocol step writes through, and
the links that carry PPRC updates between storage units."""
