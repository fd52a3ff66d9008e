//! The cases by the server they need: `outages` on a dedicated one (killed, cut, restarted),
//! `refusals` on the shared one (what the broker refuses, and the headers it carries).

mod outages;
mod refusals;

pub use outages::{
    confirm_before_mark, cut_is_unavailable, key_order_through_a_cut, killed_is_unavailable, restart_mid_stream,
};
pub use refusals::{
    headers_end_to_end, missing_destination_is_permanent, mixed_batch, mixed_batch_relay, oversize_is_permanent,
};
