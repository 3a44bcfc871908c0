//! Relevance-propagation (LRP) rules as runtime switches on the forward pass.
//!
//! Each rule is a stop-gradient rewrite that leaves the forward value unchanged and
//! changes only what the backward pass computes (Jafari et al. 2025, "RelP"):
//!
//! | rule | rewrite (`sg` = detach) |
//! |---|---|
//! | LN-rule | `y = (x - mean(x)) / sg(sqrt(var(x) + eps)) * w + b`; RMSNorm `y = x / sg(rms(x)) * w` |
//! | identity rule | `y = x * sg(f(x) / x)` for GELU / SiLU |
//! | half rule | `p = a * b`, `y = p/2 + sg(p/2)` for the SwiGLU product |
//! | AH-rule | `A = sg(softmax(scores))`: relevance flows through V only |

use serde::{Deserialize, Serialize};

/// Which LRP rules are on. All off is the plain gradient.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LrpRules {
    /// LN-rule: the norm's scale is held constant.
    pub ln: bool,
    /// Identity rule on the MLP activation.
    pub identity: bool,
    /// Half rule on the gated-MLP product.
    pub half: bool,
    /// AH-rule: attention weights held constant.
    pub attn: bool,
}

impl LrpRules {
    /// No rule: the plain gradient (AtP).
    pub const NONE: LrpRules = LrpRules { ln: false, identity: false, half: false, attn: false };
    /// RelP's default set: LN, identity and half rules.
    pub const RELP: LrpRules = LrpRules { ln: true, identity: true, half: true, attn: false };
    /// All four rules.
    pub const ALL: LrpRules = LrpRules { ln: true, identity: true, half: true, attn: true };

    /// Whether any rule is on.
    pub fn any(&self) -> bool {
        self.ln || self.identity || self.half || self.attn
    }
}
