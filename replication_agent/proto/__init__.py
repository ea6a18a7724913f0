"""Generated bindings of agent.proto (regenerate with scripts/gen-protos)."""
