{{/* fullnameOverride, else the release name when it holds the chart's ("tiered", not
     "tiered-tiered"), else <release>-tiered. At most 40 characters: KubeRay derives
     longer names (<name>-<hash>-head-svc, ...) from it. */}}
{{- define "tiered.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride }}
{{- else if contains .Chart.Name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end -}}

{{/* KubeRay's Serve Service: it selects the pods of the RayCluster that serves, so an
     upgrade (a new RayCluster) moves the traffic at once, never to both clusters. */}}
{{- define "tiered.serveService" -}}
{{- printf "%s-serve-svc" (include "tiered.fullname" .) -}}
{{- end -}}

{{- define "tiered.monitoringLabels" -}}
{{ include "tiered.labels" . }}
{{- with .Values.monitoring.labels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "tiered.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tiered.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tiered.keysSecret" -}}
{{- default (printf "%s-api-keys" (include "tiered.fullname" .)) .Values.apiKeys.existingSecret -}}
{{- end -}}

{{/* The Tiered config's node_types, one per worker group. */}}
{{- define "tiered.nodeTypes" -}}
{{- $out := dict }}
{{- range .Values.workerGroups }}
{{- $_ := set $out .name (dict "resources" (include "tiered.rayResources" . | fromYaml) "min_workers" (.minWorkers | default 0) "max_workers" .maxWorkers) }}
{{- end }}
{{- toYaml $out }}
{{- end -}}

{{/* The Serve config: the same shape `tiered config render` emits (deployments/render.py),
     with the Tiered config inline in the app's args and the worker groups as its node types. */}}
{{- define "tiered.serveConfig" -}}
{{- $tiered := deepCopy .Values.tiered }}
{{- $_ := set $tiered "node_types" (include "tiered.nodeTypes" . | fromYaml) -}}
proxy_location: EveryNode
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.port }}
applications:
  - name: tiered
    route_prefix: /
    import_path: deployments.app:build
    args:
      tiered:
{{ toYaml $tiered | indent 8 }}
    runtime_env:
      env_vars:
        TIERED_API_KEYS_FILE: /etc/tiered/keys/keys.yaml
{{- range .Values.tiered.tenants }}
{{- if and .dedicated .dedicated.front_door }}
  - name: tiered--{{ .name }}
    route_prefix: {{ .dedicated.front_door.route_prefix | default (printf "/tenants/%s" .name) }}
    import_path: deployments.app:build_front_door
    args:
      tiered:
{{ toYaml $tiered | indent 8 }}
      tenant: {{ .name }}
      main_app: tiered
    runtime_env:
      env_vars:
        TIERED_API_KEYS_FILE: /etc/tiered/keys/keys.yaml
{{- end }}
{{- end }}
{{- end -}}

{{/* What Ray is told a worker group's node has (CPU, GPU and custom resources), as
     numbers: the group's resources with GPU 0 left out. */}}
{{- define "tiered.rayResources" -}}
{{- $out := dict }}
{{- range $name, $amount := .resources }}
{{- if not (and (eq $name "GPU") (not $amount)) }}
{{- $_ := set $out $name $amount }}
{{- end }}
{{- end }}
{{- toYaml $out }}
{{- end -}}

{{/* The pod parts every Ray container shares: image, keys, state store URL, and the
     pod's own volume mounts (`mounts`). The URL comes from the Secret alone
     (secretKeyRef), never a value in a manifest, and goes to head and workers alike: the
     ingress replicas and the admission actor may run on any Ray pod. */}}
{{- define "tiered.container" -}}
{{- $mounts := .mounts | default list }}
{{- with .root -}}
image: "{{ .Values.image.repository }}:{{ .Values.image.tag }}"
imagePullPolicy: {{ .Values.image.pullPolicy }}
env:
  - name: TIERED_API_KEYS_FILE
    value: /etc/tiered/keys/keys.yaml
{{- with .Values.state }}
{{- if .existingSecret }}
  - name: TIERED_STATE_URL
    valueFrom:
      secretKeyRef:
        name: {{ .existingSecret | quote }}
        key: {{ .existingSecretKey | default "url" | quote }}
{{- end }}
{{- end }}
volumeMounts:
  - name: api-keys
    mountPath: /etc/tiered/keys
    readOnly: true
{{- with $mounts }}
{{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}
{{- end -}}
