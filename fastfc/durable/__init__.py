"""Floor 5, durability: storage units (a directory of volume files, bitmap
files and an SQLite store) and the lock that gives a unit one owner."""
