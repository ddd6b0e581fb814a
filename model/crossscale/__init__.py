"""The cross-scale model: a sampler that picks the HR tiles worth fetching from the LR scene and a
predictor that completes the scene's HR tile embeddings from the ones fetched; trained from
cached features (features, pretrain, train, fit) and evaluated (evaluate, eval_report, metrics)."""
