"""gRPC server wiring for memupdate: servicer, auth, health, reflection, start-up."""
