//! Token and session objects: lookup by handle and by template, attributes, creation,
//! key generation and destruction, with PKCS#11's visibility and login rules.

use std::collections::BTreeMap;

use cryptoki_sys::*;
use ring::rand::SecureRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use zeroize::Zeroizing;

use super::{
    AttrOut, Mechanism, Object, P256_PARAMS, Rv, Session, SessionObject, Sim, bool_bytes,
    ulong_bytes,
};

impl Sim {
    // ---- objects ---------------------------------------------------------------------------

    pub(super) fn session(&self, h: CK_SESSION_HANDLE) -> Result<&Session, Rv> {
        self.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)
    }

    /// An object the session may see: its token's (private ones only when logged in) or its own.
    pub(super) fn object(&self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<&Object, Rv> {
        let s = self.session(h)?;
        let t = &self.tokens[s.slot];
        let obj = t
            .objects
            .get(&o)
            .or_else(|| {
                self.session_objects
                    .get(&o)
                    .filter(|so| so.slot == s.slot)
                    .map(|so| &so.object)
            })
            .ok_or(CKR_OBJECT_HANDLE_INVALID)?;
        if obj.is_private() && !t.user_logged_in {
            return Err(CKR_OBJECT_HANDLE_INVALID);
        }
        Ok(obj)
    }

    /// Checks a template, fills the defaults, and stores the object.
    pub(super) fn store(
        &mut self,
        h: CK_SESSION_HANDLE,
        obj: Object,
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        let s = self.session(h)?;
        let (slot, rw) = (s.slot, s.rw);
        let logged_in = self.tokens[slot].user_logged_in;
        if obj.is_private() && !logged_in {
            return Err(CKR_USER_NOT_LOGGED_IN);
        }
        let token_object = obj.flag(CKA_TOKEN);
        if token_object && !rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
        let handle = self.handle();
        if token_object {
            self.tokens[slot].objects.insert(handle, obj);
            if let Err(rv) = self.save() {
                self.tokens[slot].objects.remove(&handle);
                return Err(rv);
            }
        } else {
            self.session_objects.insert(
                handle,
                SessionObject {
                    owner: h,
                    slot,
                    object: obj,
                },
            );
        }
        Ok(handle)
    }

    pub(crate) fn destroy(&mut self, h: CK_SESSION_HANDLE, o: CK_OBJECT_HANDLE) -> Result<(), Rv> {
        let obj = self.object(h, o)?;
        if obj
            .attrs
            .get(&CKA_DESTROYABLE)
            .is_some_and(|v| v.first() == Some(&0))
        {
            return Err(CKR_ACTION_PROHIBITED);
        }
        let token_object = obj.flag(CKA_TOKEN);
        let s = self.session(h)?;
        let (slot, rw) = (s.slot, s.rw);
        if token_object {
            if !rw {
                return Err(CKR_SESSION_READ_ONLY);
            }
            let removed = self.tokens[slot].objects.remove(&o);
            if let Err(rv) = self.save() {
                if let Some(obj) = removed {
                    self.tokens[slot].objects.insert(o, obj);
                }
                return Err(rv);
            }
        } else {
            self.session_objects.remove(&o);
        }
        Ok(())
    }

    pub(crate) fn get_attribute(
        &self,
        h: CK_SESSION_HANDLE,
        o: CK_OBJECT_HANDLE,
        t: CK_ATTRIBUTE_TYPE,
    ) -> Result<AttrOut, Rv> {
        let obj = self.object(h, o)?;
        if t == CKA_VALUE {
            let class = obj.ulong(CKA_CLASS);
            let hidden = obj.flag(CKA_SENSITIVE) || !obj.flag(CKA_EXTRACTABLE);
            return Ok(match class {
                Some(CKO_SECRET_KEY) | Some(CKO_PRIVATE_KEY) if hidden => AttrOut::Sensitive,
                Some(CKO_SECRET_KEY) => AttrOut::Value(obj.secret.to_vec()),
                Some(CKO_DATA) => {
                    AttrOut::Value(obj.attrs.get(&CKA_VALUE).cloned().unwrap_or_default())
                }
                _ => AttrOut::Invalid,
            });
        }
        Ok(obj
            .attrs
            .get(&t)
            .map_or(AttrOut::Invalid, |v| AttrOut::Value(v.clone())))
    }

    pub(crate) fn find_init(
        &mut self,
        h: CK_SESSION_HANDLE,
        template: Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>,
    ) -> Result<(), Rv> {
        let s = self.session(h)?;
        if s.found.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        let t = &self.tokens[s.slot];
        let visible = |o: &Object| !o.is_private() || t.user_logged_in;
        let session_objects = self
            .session_objects
            .iter()
            .filter(|(_, so)| so.slot == s.slot)
            .map(|(h, so)| (h, &so.object));
        let found: Vec<CK_OBJECT_HANDLE> = t
            .objects
            .iter()
            .chain(session_objects)
            .filter(|(_, o)| visible(o) && o.matches(&template))
            .map(|(h, _)| *h)
            .collect();
        if let Some(s) = self.sessions.get_mut(&h) {
            s.found = Some(found);
        }
        Ok(())
    }

    pub(crate) fn find(
        &mut self,
        h: CK_SESSION_HANDLE,
        max: usize,
    ) -> Result<Vec<CK_OBJECT_HANDLE>, Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        let found = s.found.as_mut().ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let n = max.min(found.len());
        Ok(found.drain(..n).collect())
    }

    pub(crate) fn find_final(&mut self, h: CK_SESSION_HANDLE) -> Result<(), Rv> {
        let s = self
            .sessions
            .get_mut(&h)
            .ok_or(CKR_SESSION_HANDLE_INVALID)?;
        s.found
            .take()
            .map(|_| ())
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)
    }

    // ---- key generation --------------------------------------------------------------------

    pub(super) fn key_object(
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        class: CK_OBJECT_CLASS,
        key_type: CK_KEY_TYPE,
        mech: CK_MECHANISM_TYPE,
    ) -> Result<Object, Rv> {
        let mut attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>> = BTreeMap::new();
        for (t, v) in template {
            let bool_attr = matches!(
                *t,
                CKA_TOKEN
                    | CKA_PRIVATE
                    | CKA_SENSITIVE
                    | CKA_EXTRACTABLE
                    | CKA_MODIFIABLE
                    | CKA_COPYABLE
                    | CKA_DESTROYABLE
                    | CKA_ENCRYPT
                    | CKA_DECRYPT
                    | CKA_WRAP
                    | CKA_UNWRAP
                    | CKA_SIGN
                    | CKA_VERIFY
                    | CKA_DERIVE
            );
            let ok = match *t {
                _ if bool_attr => v.len() == 1,
                CKA_CLASS | CKA_KEY_TYPE | CKA_VALUE_LEN => {
                    v.len() == std::mem::size_of::<CK_ULONG>()
                }
                CKA_ID | CKA_LABEL | CKA_EC_PARAMS => true,
                CKA_VALUE => return Err(CKR_ATTRIBUTE_READ_ONLY),
                _ => return Err(CKR_ATTRIBUTE_TYPE_INVALID),
            };
            if !ok {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            attrs.insert(*t, v.clone());
        }
        if attrs
            .get(&CKA_CLASS)
            .is_some_and(|v| *v != ulong_bytes(class))
            || attrs
                .get(&CKA_KEY_TYPE)
                .is_some_and(|v| *v != ulong_bytes(key_type))
        {
            return Err(CKR_TEMPLATE_INCONSISTENT);
        }
        attrs.insert(CKA_CLASS, ulong_bytes(class));
        attrs.insert(CKA_KEY_TYPE, ulong_bytes(key_type));
        let private_default = class != CKO_PUBLIC_KEY;
        for (t, default) in [
            (CKA_TOKEN, false),
            (CKA_PRIVATE, private_default),
            (CKA_MODIFIABLE, true),
            (CKA_COPYABLE, true),
            (CKA_DESTROYABLE, true),
            (CKA_DERIVE, false),
        ] {
            attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        if class != CKO_PUBLIC_KEY {
            attrs
                .entry(CKA_SENSITIVE)
                .or_insert_with(|| bool_bytes(true));
            attrs
                .entry(CKA_EXTRACTABLE)
                .or_insert_with(|| bool_bytes(false));
            let always = attrs[&CKA_SENSITIVE] == bool_bytes(true);
            let never = attrs[&CKA_EXTRACTABLE] == bool_bytes(false);
            attrs.insert(CKA_ALWAYS_SENSITIVE, bool_bytes(always));
            attrs.insert(CKA_NEVER_EXTRACTABLE, bool_bytes(never));
        }
        attrs.entry(CKA_ID).or_default();
        attrs.entry(CKA_LABEL).or_default();
        attrs.insert(CKA_LOCAL, bool_bytes(true));
        attrs.insert(CKA_KEY_GEN_MECHANISM, ulong_bytes(mech));
        Ok(Object {
            attrs,
            secret: Zeroizing::new(Vec::new()),
        })
    }

    /// `C_CreateObject`, for data objects (`CKO_DATA`) only: Tresor keeps small records in the
    /// token this way (creation journals, destruction orders, the audit anchor). Keys can only
    /// be generated inside the token, never imported.
    pub(crate) fn create_object(
        &mut self,
        h: CK_SESSION_HANDLE,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.session(h)?;
        let mut attrs: BTreeMap<CK_ATTRIBUTE_TYPE, Vec<u8>> = BTreeMap::new();
        for (t, v) in template {
            let ok = match *t {
                CKA_TOKEN | CKA_PRIVATE | CKA_MODIFIABLE | CKA_COPYABLE | CKA_DESTROYABLE => {
                    v.len() == 1
                }
                CKA_CLASS => v.len() == std::mem::size_of::<CK_ULONG>(),
                CKA_LABEL | CKA_APPLICATION | CKA_VALUE | CKA_OBJECT_ID => true,
                _ => return Err(CKR_ATTRIBUTE_TYPE_INVALID),
            };
            if !ok {
                return Err(CKR_ATTRIBUTE_VALUE_INVALID);
            }
            attrs.insert(*t, v.clone());
        }
        match attrs.get(&CKA_CLASS) {
            Some(c) if *c == ulong_bytes(CKO_DATA) => {}
            Some(_) => return Err(CKR_TEMPLATE_INCONSISTENT),
            None => return Err(CKR_TEMPLATE_INCOMPLETE),
        }
        for (t, default) in [
            (CKA_TOKEN, false),
            (CKA_PRIVATE, true),
            (CKA_MODIFIABLE, true),
            (CKA_COPYABLE, true),
            (CKA_DESTROYABLE, true),
        ] {
            attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        for t in [CKA_LABEL, CKA_APPLICATION, CKA_VALUE] {
            attrs.entry(t).or_default();
        }
        self.store(
            h,
            Object {
                attrs,
                secret: Zeroizing::new(Vec::new()),
            },
        )
    }

    pub(crate) fn generate_key(
        &mut self,
        h: CK_SESSION_HANDLE,
        mech: Mechanism,
        template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<CK_OBJECT_HANDLE, Rv> {
        self.session(h)?;
        let (key_type, mech_type, sizes) = match mech {
            Mechanism::AesKeyGen => (CKK_AES, CKM_AES_KEY_GEN, &[16usize, 24, 32][..]),
            Mechanism::GenericSecretKeyGen => (
                CKK_GENERIC_SECRET,
                CKM_GENERIC_SECRET_KEY_GEN,
                &[16, 32, 48, 64][..],
            ),
            Mechanism::Other => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        };
        let mut obj = Self::key_object(template, CKO_SECRET_KEY, key_type, mech_type)?;
        let len = obj.ulong(CKA_VALUE_LEN).ok_or(CKR_TEMPLATE_INCOMPLETE)?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| sizes.contains(l))
            .ok_or(CKR_KEY_SIZE_RANGE)?;
        for (t, default) in [
            (CKA_ENCRYPT, false),
            (CKA_DECRYPT, false),
            (CKA_SIGN, false),
            (CKA_VERIFY, false),
            (CKA_WRAP, false),
            (CKA_UNWRAP, false),
        ] {
            obj.attrs.entry(t).or_insert_with(|| bool_bytes(default));
        }
        let mut value = Zeroizing::new(vec![0u8; len]);
        self.rng.fill(&mut value).map_err(|_| CKR_DEVICE_ERROR)?;
        obj.secret = value;
        self.store(h, obj)
    }

    pub(crate) fn generate_key_pair(
        &mut self,
        h: CK_SESSION_HANDLE,
        mech: Mechanism,
        public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
        private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    ) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), Rv> {
        self.session(h)?;
        match mech {
            Mechanism::EcKeyPairGen => {}
            Mechanism::Other => return Err(CKR_MECHANISM_INVALID),
            _ => return Err(CKR_KEY_TYPE_INCONSISTENT),
        }
        let mut pub_obj = Self::key_object(public, CKO_PUBLIC_KEY, CKK_EC, CKM_EC_KEY_PAIR_GEN)?;
        match pub_obj.attrs.get(&CKA_EC_PARAMS) {
            Some(p) if *p == P256_PARAMS => {}
            Some(_) => return Err(CKR_CURVE_NOT_SUPPORTED),
            None => return Err(CKR_TEMPLATE_INCOMPLETE),
        }
        let mut priv_obj = Self::key_object(private, CKO_PRIVATE_KEY, CKK_EC, CKM_EC_KEY_PAIR_GEN)?;
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &self.rng)
            .map_err(|_| CKR_DEVICE_ERROR)?;
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &self.rng)
                .map_err(|_| CKR_DEVICE_ERROR)?;
        let point = pair.public_key().as_ref().to_vec();
        // CKA_EC_POINT is the DER OCTET STRING of the uncompressed point.
        let mut der = vec![
            0x04,
            u8::try_from(point.len()).map_err(|_| CKR_DEVICE_ERROR)?,
        ];
        der.extend_from_slice(&point);
        pub_obj.attrs.insert(CKA_EC_POINT, der);
        pub_obj
            .attrs
            .entry(CKA_VERIFY)
            .or_insert_with(|| bool_bytes(true));
        priv_obj.attrs.insert(CKA_EC_PARAMS, P256_PARAMS.to_vec());
        priv_obj
            .attrs
            .entry(CKA_SIGN)
            .or_insert_with(|| bool_bytes(true));
        priv_obj.secret = Zeroizing::new(pkcs8.as_ref().to_vec());
        let pub_handle = self.store(h, pub_obj)?;
        match self.store(h, priv_obj) {
            Ok(priv_handle) => Ok((pub_handle, priv_handle)),
            Err(rv) => {
                let _ = self.destroy(h, pub_handle);
                Err(rv)
            }
        }
    }
}
