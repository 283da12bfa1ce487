"""What every command-line tool shares: input files, output files and their records, flags, progress."""
