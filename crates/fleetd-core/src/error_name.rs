//! Error names written once. An error's stable name (`signature-invalid`,
//! `slot-io`, ...) is a public interface: status documents, MQTT reports,
//! D-Bus and the CLI carry it. `named_error!` declares an error enum with
//! each variant's name next to it and generates both `name()` and the
//! name's place in the `#[error]` text, so the two cannot drift apart.
//!
//! Each variant starts with its doc comments, then one of:
//!
//! - `#[name = "slot-io"]`: the `#[error]` text shows it as `{name}`
//!   (rustc refuses a text that leaves it out);
//! - `#[name(of 0)]`: the name of the error in that field (a wrapper);
//! - `#[name(hidden = "io")]`: a name the text does not show (it is the
//!   wrapped error's own text).
//!
//! then its `#[error(...)]`. No dependencies: plain `macro_rules!`.

#[macro_export]
macro_rules! named_error {
    (
        $(#[$meta:meta])*
        $vis:vis enum $enum:ident {
            $(
                $(#[doc = $doc:literal])*
                #[name $(= $wire:literal)? $((of $field:tt))? $((hidden = $hidden:literal))?]
                #[error($($error:tt)*)]
                $variant:ident $({ $($named:tt)* })? $(( $($tuple:tt)* ))?
            ),* $(,)?
        }
    ) => {
        $(#[$meta])*
        $vis enum $enum {
            $(
                $(#[doc = $doc])*
                #[error($($error)* $(, name = $wire)?)]
                $variant $({ $($named)* })? $(( $($tuple)* ))?,
            )*
        }

        impl $enum {
            /// The stable name of this error.
            pub fn name(&self) -> &'static str {
                match self {
                    $(
                        $(Self::$variant { .. } => $wire,)?
                        $(Self::$variant { $field: inner, .. } => inner.name(),)?
                        $(Self::$variant { .. } => $hidden,)?
                    )*
                }
            }
        }
    };
}

pub use crate::named_error;

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("inner-name: inner")]
    struct Inner;

    impl Inner {
        fn name(&self) -> &'static str {
            "inner-name"
        }
    }

    named_error! {
        #[derive(Debug, thiserror::Error)]
        enum Sample {
            /// A named field.
            #[name = "sample-named"]
            #[error("{name}: {what}")]
            Named { what: String },
            #[name = "sample-tuple"]
            #[error("{0}: {name}")]
            Tuple(u32),
            #[name = "sample-unit"]
            #[error("{name}: nothing more")]
            Unit,
            #[name(of 0)]
            #[error(transparent)]
            Wrapped(Inner),
            #[name(hidden = "quiet")]
            #[error("{0}")]
            Quiet(String),
        }
    }

    #[test]
    fn the_name_is_the_one_in_the_text() {
        let cases = [
            (Sample::Named { what: "x".into() }, "sample-named", "sample-named: x"),
            (Sample::Tuple(7), "sample-tuple", "7: sample-tuple"),
            (Sample::Unit, "sample-unit", "sample-unit: nothing more"),
            (Sample::Wrapped(Inner), "inner-name", "inner-name: inner"),
            (Sample::Quiet("as is".into()), "quiet", "as is"),
        ];
        for (error, name, text) in cases {
            assert_eq!(error.name(), name);
            assert_eq!(error.to_string(), text);
        }
    }
}
