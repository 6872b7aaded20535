//! The installer page (`GET /`): one self-contained file, phone-first, no
//! external resources, plain JS.

pub const PAGE: &str = include_str!("page.html");

/// Only this page's own inline script and style; the QR code is inline SVG.
pub const CSP: &str =
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; connect-src 'self'; form-action 'none'; frame-ancestors 'none'";
