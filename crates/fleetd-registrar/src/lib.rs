//! fleetd's registrar (see ARCHITECTURE.md).
