//! Component counters: atomics the hot path bumps, and a plain copy for stats and reports.

/// Declares `$stats` (one `AtomicU64` per field, bumped where the thing happens) and
/// `$counters` (the same fields as `u64`, serialisable), with `$stats::snapshot`.
macro_rules! counters {
    (
        $(#[$stats_meta:meta])*
        pub struct $stats:ident => $(#[$counters_meta:meta])* $counters:ident {
            $( $(#[$field_meta:meta])* $field:ident, )*
        }
    ) => {
        $(#[$stats_meta])*
        #[derive(Debug, Default)]
        pub struct $stats {
            $( $(#[$field_meta])* pub $field: ::std::sync::atomic::AtomicU64, )*
        }

        $(#[$counters_meta])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, ::serde::Serialize, ::serde::Deserialize,
        )]
        #[allow(missing_docs)]
        pub struct $counters {
            $( pub $field: u64, )*
        }

        impl $stats {
            /// The counters now.
            pub fn snapshot(&self) -> $counters {
                $counters {
                    $( $field: self.$field.load(::std::sync::atomic::Ordering::Relaxed), )*
                }
            }
        }
    };
}

pub(crate) use counters;
