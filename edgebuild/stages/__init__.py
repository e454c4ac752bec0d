"""Stage implementations; the registry of kinds lives in edgebuild.stage.REGISTRY."""
