"""Cartridge Desktop engine: corpus -> synthesis -> training -> cartridge -> inference."""
