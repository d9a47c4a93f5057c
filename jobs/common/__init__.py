"""What every stage shares: staging, manifests, CLI plumbing, progress and model loading."""
