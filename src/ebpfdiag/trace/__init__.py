"""What every tracer shares: sightings, the same packet across hosts, flows and paths."""
