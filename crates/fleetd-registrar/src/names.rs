//! What a serial, a user name and a role may be: checked before any query.

use crate::error::{RegistrarError, Result};

pub const MAX_NAME_LEN: usize = 64;

/// `[A-Za-z0-9._:-]{1,64}`.
pub fn check_serial(serial: &str) -> Result<&str> {
    let ok = (1..=MAX_NAME_LEN).contains(&serial.len())
        && serial.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'));
    ok.then_some(serial).ok_or(RegistrarError::SerialInvalid)
}

/// `[a-z0-9._-]{1,64}`.
pub fn check_user(user: &str) -> Result<&str> {
    let ok = (1..=MAX_NAME_LEN).contains(&user.len())
        && user
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-'));
    ok.then_some(user).ok_or(RegistrarError::UserInvalid)
}

/// Who a user is to the registrar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Admin,
    Installer,
}

impl Role {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "admin" => Ok(Role::Admin),
            "installer" => Ok(Role::Installer),
            other => Err(RegistrarError::RoleInvalid(other.to_string())),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Installer => "installer",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_and_users_by_table() {
        let long = "a".repeat(65);
        let serials: [(&str, bool); 9] = [
            ("gw-0042", true),
            ("A.b_c:d-9", true),
            (&long[..64], true),
            ("", false),
            (&long, false),
            ("gw 0042", false),
            ("x'; DROP TABLE devices; --", false),
            ("é", false),
            ("a/b", false),
        ];
        for (serial, ok) in serials {
            assert_eq!(check_serial(serial).is_ok(), ok, "{serial:?}");
        }
        let users: [(&str, bool); 6] = [
            ("alice", true),
            ("a.b_c-9", true),
            ("Alice", false),
            ("", false),
            ("a:b", false),
            (&long, false),
        ];
        for (user, ok) in users {
            assert_eq!(check_user(user).is_ok(), ok, "{user:?}");
        }
        assert_eq!(check_serial("a;b").unwrap_err().name(), "serial-invalid");
        assert_eq!(check_user("A").unwrap_err().name(), "user-invalid");
    }
}
